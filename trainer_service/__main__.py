from trainer_service.cli import main

main()
