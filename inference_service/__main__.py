from inference_service.cli import main

main()
